"""Running a comparison: plan the grid, measure it through a backend, write the results folder.

``plan`` (cells and passages, before any weights load), ``schedule`` (a passage's quality passes and its
rounds of latency trials), ``figures`` (a cell's row fields from its passes), ``passages`` (what both backends
share), ``backends`` (the serial backend) and ``distributed`` (Ray), ``runner`` (the folder, progress,
writing and the finish), ``results`` (the folder on disk), ``resume``, ``estimate`` (``--dry-run``) and
``quality_batch`` (how many quality passes share a batch).

Run imports the engine, the inputs and the analysis (the noise floor), never the report.
"""
