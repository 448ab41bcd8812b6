"""SAMSelfPromptLib: the SAM-SP engine behind the Slicer module, the CLI and the web app.

Importing this package installs nothing, touches no network and imports no Qt.
"""

__version__ = "0.1.0"
