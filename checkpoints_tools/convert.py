"""Convert a Hugging Face Mixtral checkpoint (safetensors) to our orbax format.

    python -m checkpoints_tools.convert --hf HF_DIR --out OUT_DIR [--dtype bfloat16|float32|float16]

The whole checkpoint is validated from its headers first (names, shapes, dtypes, truncation), then
streamed one parameter at a time, so memory stays near one stacked expert tensor and a bad checkpoint
fails before anything is written. A failure prints one ``error: FILE: ...`` line, exits 1, and leaves
nothing at OUT_DIR.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from scalellm_jax.checkpoints.hf_layout import DTYPES, iter_params_from_hf, target_dtype, validate_hf
from scalellm_jax.checkpoints.orbax_io import write_converted
from scalellm_jax.checkpoints.safetensors_io import CheckpointError, HFCheckpoint
from scalellm_jax.config import ConfigError

log = logging.getLogger(__name__)


def convert_checkpoint(
    hf_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str | None = None,
    progress: bool = True,
) -> Path:
    """HF folder -> our format at ``out_dir``. ``dtype`` None keeps the checkpoint's dtype."""
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: output path already exists; remove it or choose another --out")
    ckpt = HFCheckpoint(hf_dir)
    cfg = ckpt.config
    _, source_dtype = validate_hf(ckpt, cfg)
    target = target_dtype(ckpt, source_dtype, dtype)
    params = iter_params_from_hf(ckpt, cfg, target)
    return write_converted(out, cfg, params, target.name, progress=progress)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--hf", required=True, help="Hugging Face checkpoint folder (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast parameters to this dtype (default: keep the checkpoint's dtype)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = convert_checkpoint(args.hf, args.out, args.dtype, progress=not args.no_progress)
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing written at {args.out}", file=sys.stderr)
        return 130
    log.info("converted %s -> %s", args.hf, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
