"""The producer side is what a web backend installs: it must never pull in torch."""

from __future__ import annotations

import subprocess
import sys


def test_producer_never_imports_torch() -> None:
    code = ("import sys, producer, producer.cli, producer.bulk, producer.launcher, producer.webhooks; "
            "from producer import SdQueue, Txt2ImgJob; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
