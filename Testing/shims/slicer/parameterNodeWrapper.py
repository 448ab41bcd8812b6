"""Test shim of slicer.parameterNodeWrapper: keeps the declared fields and their defaults.

The real wrapper binds fields to a vtkMRMLScriptedModuleNode and to widgets named by
their SlicerParameterName property; here the class is kept as a plain container so
that tests can compare its declared fields with the .ui file.
"""
import typing


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


def parameterNodeWrapper(cls):
    cls.declared = typing.get_type_hints(cls, include_extras=True)

    def __init__(self, node=None):
        self.node = node
        for name in cls.declared:
            setattr(self, name, getattr(cls, name, None))

    cls.__init__ = __init__
    return cls
