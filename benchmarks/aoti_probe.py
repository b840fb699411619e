"""Does AOTInductor build and load on this GPU machine, and how long does each stage take?

python -m benchmarks.aoti_probe     # prints stage times; dumps stacks every 20 s while stuck
"""

from __future__ import annotations

import faulthandler
import sys
import time

import torch


def stage(name: str, began: float) -> float:
    now = time.perf_counter()
    print(f"{name}: {now - began:.1f}s", flush=True)
    return now


def main() -> None:
    faulthandler.dump_traceback_later(20, repeat=True, file=sys.stderr)
    t = time.perf_counter()
    module = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).cuda().half()
    x = torch.randn(8, 64, device="cuda", dtype=torch.half)
    exported = torch.export.export(module, (x,))
    t = stage("export", t)
    path = torch._inductor.aoti_compile_and_package(
        exported,
        package_path="/tmp/aoti-probe.pt2",
        inductor_configs={"aot_inductor.package_constants_in_so": False},
    )
    t = stage("compile and package", t)
    from torch._inductor.package import load_package  # type: ignore[attr-defined]

    runner = load_package(path)
    state = dict(module.named_parameters())
    runner.load_constants(
        {k: state[k] for k in runner.get_constant_fqns()}, check_full_update=True, user_managed=True
    )
    t = stage("load", t)
    print("max abs diff", float((runner(x) - module(x)).abs().max()), flush=True)


if __name__ == "__main__":
    main()
