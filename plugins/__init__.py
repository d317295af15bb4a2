"""kvcompare's built-in policy and task plugins.

Each module is one plugin with one small policy or task class, written exactly like a third-party plugin (see
examples/kvcompare-example-plugin). They load by import: a new one is a module here plus one line in
``kvcompare.plugins.BUILTIN_PLUGINS``; the `kvcompare` entry-point group is for third-party plugins.
"""
