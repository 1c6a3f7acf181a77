#!/usr/bin/env python3
"""`make chat`: streaming chat with a running stack (python_backends/tools/chat.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from python_backends.tools.chat import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
