"""kvcompare's built-in policy plugins.

Each module is one plugin with one small policy class. They are found through the `kvcompare` entry-point
group, exactly like third-party plugins (see examples/kvcompare-example-plugin).
"""
