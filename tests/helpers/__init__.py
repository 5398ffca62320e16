"""Helpers the whole test suite shares, in one place (fixtures stay in the conftest.py files).

* ``support``: settings, queue and storage inspection, the mock HTTP client.
* ``dataset_files``: dataset files of every format, written in memory.
* ``hostile_files``: crafted files and the time / memory harness that measures their refusal.
* ``pt2_files``: .pt2 archives written by hand, without torch.
* ``tasks``: small synthetic engine tasks.
* ``net``: free loopback ports.
* ``properties``: the hypothesis settings of the file readers' property tests.
"""
