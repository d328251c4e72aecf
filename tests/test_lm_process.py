"""The LM pass in a child process (:mod:`ecdcfs.lm_process`): the codes it sends are the
in-process decode's bit for bit, it leaves no process behind, and its failures come back as
the errors they are. (That a process reading LM-coded files never imports torch:
test_onnx.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

import synth
from ecdcfs.container import MODELS, ContainerError, parse_header
from ecdcfs.lm import load_lm
from ecdcfs.lm_process import LanguageModel, find_lm
from ecdcfs.source import MemorySource
from ecdcfs.units import decode_units


def children() -> set[int]:
    """The pids of this process's children that run the LM pass."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat[1]) == os.getpid() and b"ecdcfs.lm_process" in cmdline:
                found.add(int(entry))
    return found


@pytest.mark.parametrize(
    ("model", "samples", "block_steps"),
    [
        ("encodec_48khz", 2 * 47_520 + 400, None),  # three frames, the last short
        ("encodec_24khz", 24_000 * 2 + 77, 40),  # blocks of 40 steps, the last short
        ("encodec_24khz", 24_000 * 2 + 77, None),  # the grid's own: one block
    ],
)
def test_the_child_sends_the_in_process_codes_bit_for_bit(torch_home, model, samples, block_steps):
    data = synth.make_ecdc(model, samples, 6, lm=True)
    units = decode_units(parse_header(data, len(data)), block_steps)
    expected = list(units.scan_lm(load_lm(MODELS[model]), MemorySource(data), 0, 0))
    got = list(find_lm(MODELS[model]).scan(data, 0, 0, units.index_block_steps))
    assert [(n, s, o) for n, s, _, o in got] == [(n, s, o) for n, s, _, o in expected]
    for (*_, codes, _), (*_, reference, _) in zip(got, expected, strict=True):
        assert codes.dtype == np.int64 and np.array_equal(codes, reference)
    assert not children()  # it exited with the index built


def test_a_scan_resumes_from_a_later_frame(torch_home):
    data = synth.make_ecdc("encodec_48khz", 3 * 47_520, 3, lm=True)
    whole = list(LanguageModel(MODELS["encodec_48khz"]).scan(data, 0, 0, None))
    _, _, _, offset = whole[0]
    resumed = list(LanguageModel(MODELS["encodec_48khz"]).scan(data, 1, offset, None))
    assert [u[0] for u in resumed] == [1, 2]
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(resumed, whole[1:], strict=True))


def test_a_corrupt_payload_comes_back_as_a_container_error(torch_home):
    data = bytearray(synth.make_ecdc("encodec_48khz", 30_000, 6, lm=True))
    header = parse_header(bytes(data), len(data))
    del data[header.payload_offset + 12 :]  # a frame cut short
    with pytest.raises(ContainerError, match="truncated"):
        list(LanguageModel(MODELS["encodec_48khz"]).scan(bytes(data), 0, 0, None))
    assert not children()


def test_stopping_a_scan_early_ends_its_child(torch_home):
    data = synth.make_ecdc("encodec_48khz", 4 * 47_520, 6, lm=True)
    scan = LanguageModel(MODELS["encodec_48khz"]).scan(data, 0, 0, None)
    next(scan)
    assert children()
    scan.close()
    assert not children()


def test_a_child_that_dies_is_an_error_naming_its_exit(torch_home, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(Exception, match="the LM process exited with 1"):
        list(LanguageModel(MODELS["encodec_48khz"]).scan(b"ECDC", 0, 0, None))
