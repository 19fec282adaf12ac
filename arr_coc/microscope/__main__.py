"""``python -m arr_coc.microscope``: start the microscope page (offline)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from arr_coc.microscope import core

    parser = argparse.ArgumentParser(prog="python -m arr_coc.microscope", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument(
        "--checkpoint", default=None,
        help=f"base VLM folder (default {core.DEFAULT_CHECKPOINT}, else the newest experiments/runs/*/best, else untrained)",
    )
    parser.add_argument("--allocators", default=str(core.DEFAULT_ALLOCATOR_DIR), help="folder of trained allocators")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny tensors)")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port: expected 1..65535, got {args.port}")
    try:
        models = core.load_models(args.checkpoint, args.allocators, threads=args.threads)
    except ValueError as err:
        parser.error(str(err))
    from arr_coc.microscope.app import build_app, launch

    for note in models.notes:
        print(f"note: {note}", file=sys.stderr)
    launch(build_app(models), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
