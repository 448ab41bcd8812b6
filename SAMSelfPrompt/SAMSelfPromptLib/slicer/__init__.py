"""The MRML host: the Logic (MRML in and out), the Qt-free controller, Adapt, and Slicer dependency installs.

Used by the Slicer module and by the web app (trame-slicer runs the same MRML). Nothing in the
engine imports this package.
"""
