"""SAMSelfPromptLib: the SAM-SP engine behind the Slicer module, the CLI and the web app.

Importing this package installs nothing, touches no network and imports no Qt. In Slicer's
Python console or a notebook with slicer-core::

    from SAMSelfPromptLib import SAMSelfPromptLogic
    segmentation = SAMSelfPromptLogic().auto_segment(volume_node)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: the Logic needs slicer (MRML); the CLI and the engine must import without it.
    if name == "SAMSelfPromptLogic":
        from .slicer.logic import SAMSelfPromptLogic

        return SAMSelfPromptLogic
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
