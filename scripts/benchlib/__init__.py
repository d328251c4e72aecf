"""The sections of ``scripts/bench``: each runs its own mount and returns table rows.

``common`` (run set-up, cleanup, timing, the table), ``daemon`` (the mount under test and
what its debug log says it decoded), ``plain48`` (rows 1-6: 48 kHz files), ``khz24``
(rows 7-9: 24 kHz files), ``load`` (``--load``: many readers) and ``model_rss`` (a program:
the RSS of a process that loads one model).
"""
