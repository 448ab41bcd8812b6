"""The web app host: the Slicer module's controller and Logic in a browser, through trame-slicer.

- ``inputs``: files, DICOM folders, uploads and the built-in sample, read by the engine's readers;
- ``export``: the output segmentation as .seg.nrrd, NIfTI or DICOM-SEG (the existing writers);
- ``server``: the trame-slicer app, which binds its panel to ``slicer.controller.ModuleController``
  exactly as the Qt widget does, and ticks the controller from a periodic async task.

Importing this package imports neither trame nor torch; ``server`` imports trame-slicer.
"""
