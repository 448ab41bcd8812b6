"""The `samselfprompt` command line."""

import sys

# The CLI never compiles GPU kernels (no torch.compile, no Triton kernels on any device). Yet torchvision,
# which segment-anything and timm import, imports torch._dynamo, and that imports Triton, the GPU kernel
# compiler, only to register one of its types: 75 MB resident per process. In a process the
# CLI owns, mark Triton as not installed before torch looks; torch then skips it. Hosts that embed the
# engine (Slicer, a notebook) never import this package and keep their own choice.
if "triton" not in sys.modules:
    sys.modules["triton"] = None
