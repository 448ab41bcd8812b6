"""Test shim for the few PythonQt names the module file touches at import and in the Logic base.

Only class names are provided; nothing here pretends to draw or to run an event loop.
"""


class QObject:
    def __init__(self, *args, **kwargs):
        pass


class QTimer(QObject):
    pass


class QShortcut(QObject):
    pass


class QKeySequence(QObject):
    pass


class QWidget(QObject):
    pass
