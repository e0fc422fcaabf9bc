"""Export our orbax format back to a Hugging Face checkpoint (legacy per-expert layout).

    python -m checkpoints_tools.export --ckpt OUT_DIR --hf HF_DIR

Streaming: one safetensors shard per layer (plus one for the embedding and one for the final norm
and head) and ``model.safetensors.index.json``. Each shard's header is known in advance (names and
shapes follow from the config), so a shard is written tensor by tensor with a small hand-rolled
writer instead of ``safetensors.save_file`` (which needs the whole shard in memory). Parameters are
read from orbax one at a time, so peak memory is one stacked expert tensor plus one expert.
Same rules as convert: temp folder then rename; one ``error:`` line and exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from scalellm_jax.checkpoints.hf_layout import ParamPath, Piece, hf_tensor_specs, iter_hf_tensors
from scalellm_jax.checkpoints.orbax_io import ParamReader, commit_temp, make_temp_sibling, progress_bar
from scalellm_jax.checkpoints.safetensors_io import INDEX_FILE, NP_TO_ST, CheckpointError
from scalellm_jax.config import ConfigError

log = logging.getLogger(__name__)


class SafetensorsWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.path = path
        self.entries = entries
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8 bytes
        self._file = open(path, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        want_name, want_shape, want_dtype = self.entries[self._next]
        if (name, arr.shape, arr.dtype) != (want_name, want_shape, want_dtype):
            raise CheckpointError(f"{self.path}: tensor {name} {arr.dtype.name}{list(arr.shape)} arrived where "
                                  f"{want_name} {want_dtype.name}{list(want_shape)} was expected")
        self._file.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, raise unless every announced tensor was written."""
        self._file.close()
        if check and self._next != len(self.entries):
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self.entries)} tensors written")


def shard_groups(specs: list[tuple[ParamPath, Piece]]) -> list[list[Piece]]:
    """Consecutive pieces grouped by shard: embed | layers_0 | ... | final_norm + lm_head."""
    groups: list[list[Piece]] = []
    keys: list[str] = []
    for path, piece in specs:
        key = path[0] if path[0].startswith("layers_") or path[0] == "embed" else "final"
        if not keys or keys[-1] != key:
            keys.append(key)
            groups.append([])
        groups[-1].append(piece)
    return groups


def export_checkpoint(ckpt_dir: str | os.PathLike[str], hf_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """Our format at ``ckpt_dir`` -> a transformers-loadable HF folder at ``hf_dir``."""
    out = Path(hf_dir)
    if out.exists() or out.is_symlink():
        raise CheckpointError(f"{out}: output path already exists; remove it or choose another --hf")
    reader = ParamReader(ckpt_dir)
    cfg = reader.cfg
    dtypes = {m.dtype for m in reader.meta.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{reader.path}: params have mixed dtypes {sorted(d.name for d in dtypes)}")
    dtype = np.dtype(dtypes.pop())
    specs = hf_tensor_specs(cfg)
    groups = shard_groups(specs)

    tmp = make_temp_sibling(out)
    try:
        tensors = iter_hf_tensors(reader, cfg)
        weight_map: dict[str, str] = {}
        total = 0
        with progress_bar(len(specs), f"exporting to {out.name}", progress) as bar:
            for k, group in enumerate(groups):
                fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
                writer = SafetensorsWriter(tmp / fname, [(p.name, p.hf_shape, dtype) for p in group])
                try:
                    for _ in group:
                        name, arr = next(tensors)
                        writer.write(name, arr)
                        weight_map[name] = fname
                        bar.update()
                finally:
                    writer.close(check=False)
                writer.close()
                total += writer.data_bytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config = cfg.to_hf_dict()
        config["dtype"] = config["torch_dtype"] = dtype.name
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        commit_temp(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s (%d shards, %s)", ckpt_dir, out, len(groups), dtype.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="converted checkpoint folder (from checkpoints_tools.convert)")
    parser.add_argument("--hf", required=True, help="output Hugging Face folder (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        export_checkpoint(args.ckpt, args.hf, progress=not args.no_progress)
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing written at {args.hf}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
