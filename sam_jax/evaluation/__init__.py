"""Zero-shot evaluation protocols (SAM paper, Section 7 and Appendix D) and their reports.

``single_point``: the single point valid mask protocol (mIoU after 1 .. 9 clicks). ``report``:
the results JSON, the Markdown table and the mIoU-vs-points plot that ``eval.py`` writes.
``config``: the defaults every ``configs/eval/*.py`` starts from.
"""
