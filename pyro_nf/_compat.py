"""What differs between the supported torch releases (setup.cfg's floor up to the newest)."""

from __future__ import annotations

import torch

if hasattr(torch.compiler, "is_compiling"):  # torch >= 2.3
    is_compiling = torch.compiler.is_compiling
else:

    def is_compiling() -> bool:
        """True while ``torch.compile`` traces the caller (torch 2.1 and 2.2 have it only under
        ``torch._dynamo``, whose import takes a second or two: done on the first call)."""
        import torch._dynamo

        return torch._dynamo.is_compiling()
