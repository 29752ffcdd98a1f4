"""``jitkern presets``: the model presets ``jitkern warmup --preset`` knows, and what each warms."""

from __future__ import annotations

import json

from .common import CliError, HelpFormatter, table

EPILOG = """\
examples:
  jitkern presets                          # list them
  jitkern presets llama-3.1-70b --tp 8     # shapes and the configurations it warms
  jitkern warmup --preset llama-3.1-70b --tp 8 --arch sm_90a"""


def add_parser(sub) -> None:
    p = sub.add_parser("presets", help="list model presets and the kernels each warms",
                       description="Model presets for `jitkern warmup --preset NAME`.",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("name", nargs="?", help="show this preset in full")
    p.add_argument("--tp", type=int, metavar="N", help="tensor-parallel size (default: the preset's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from ..presets import PRESETS, get_preset

    if args.name is None:
        if args.json:
            print(json.dumps([p.describe() for p in PRESETS.values()]))
            return 0
        table([[p.name, p.default_tp, len(p.configs()), p.description] for p in PRESETS.values()],
              ["preset", "tp", "kernels", "model"], right={1, 2})
        return 0
    try:
        preset = get_preset(args.name)
        configs = preset.configs(args.tp)
    except ValueError as e:
        raise CliError(str(e)) from None
    d = preset.describe(args.tp)
    d["configs"] = [{"family": f, "config": c} for f, c in configs]
    if args.json:
        print(json.dumps(d))
        return 0
    print(f"{preset.name} (tp={d['tp']}): {preset.description}")
    for part in ("attention", "mamba2", "spec_decode"):
        if part in d:
            print(f"  {part}: " + ", ".join(f"{k}={v}" for k, v in d[part].items()))
    print(f"  {len(configs)} kernel configurations:")
    for fam, cfg in configs:
        print(f"    {fam}: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    return 0
