"""Time-ordered run ids (UUIDv7, RFC 9562): newest-first listing and index locality come for free."""

from __future__ import annotations

import os
import time
import uuid


def new_run_id() -> str:
    millis = time.time_ns() // 1_000_000
    value = (millis & (2**48 - 1)) << 80 | int.from_bytes(os.urandom(10), "big") & (2**80 - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))
