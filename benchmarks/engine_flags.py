"""The engine flags of the benchmarks that build an engine in-process (``serving --overhead/--in-process``,
``prefix_caching``): ``--dtype``, ``--engine`` and ``--simulate-device``, parsed and defaulted one way, and
the device a built engine runs on, described one way."""

from __future__ import annotations

import argparse
import json


def add_engine_flags(parser: argparse.ArgumentParser, cpu_engine: dict, simulated_engine: dict,
                     scope: str = "") -> None:
    """The three flags; ``scope`` prefixes their help (e.g. the modes they apply to)."""
    parser.add_argument("--dtype", default=None,
                        help=f"{scope}model dtype (default float32; bfloat16 on a simulated device)")
    parser.add_argument("--engine", default=None, help=f"{scope}EngineConfig fields as JSON (default "
                        f"{json.dumps(cpu_engine)}; on a simulated device {json.dumps(simulated_engine)})")
    parser.add_argument("--simulate-device", default=None, metavar="DEVICE",
                        help=f"{scope}run on this simulated device (h200, h100, a100-40gb): the model step costs "
                        "the device cost model's time and no host CPU")


def resolve_engine_flags(parser: argparse.ArgumentParser, args, cpu_engine: dict, simulated_engine: dict) -> bool:
    """Checks ``--simulate-device`` and ``--engine`` (a bad one exits 2 naming it), sets ``args.dtype`` and
    ``args.engine_options`` to the regime's defaults where not given; returns whether the device is simulated."""
    simulated = args.simulate_device is not None
    if simulated:
        from device_models import DEVICES

        if args.simulate_device not in DEVICES:
            parser.error(f"--simulate-device: unknown {args.simulate_device!r}; choose one of {', '.join(DEVICES)}")
    args.dtype = args.dtype or ("bfloat16" if simulated else "float32")
    try:
        args.engine_options = json.loads(args.engine) if args.engine else dict(
            simulated_engine if simulated else cpu_engine)
    except ValueError as exc:
        parser.error(f"--engine: not JSON ({exc})")
    return simulated


def served_device(served) -> tuple[str, str | None]:
    """(the device a ``ServedModel`` runs on, the simulated device's cost model described, or None)."""
    import jax

    host = jax.devices()[0].device_kind
    simulated = served.engine.engine.simulated
    if simulated is None:
        return host, None
    return f"SIMULATED {simulated.device} on {host}", served.engine.engine.runner.cost.describe()
