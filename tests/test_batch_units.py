"""Unit conversions for directives: tables of examples, one per function (batch/units.py)."""

from __future__ import annotations

import pytest

from jobqueue_ms.batch.units import (
    lsf_mem,
    lsf_time,
    pbs_mem,
    pbs_time,
    read_lsf_unit,
    sge_mem,
    sge_time,
    slurm_mem,
    slurm_time,
)
from jobqueue_ms.deploy.render import memory_text
from jobqueue_ms.units import parse_duration, parse_memory

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("16GiB", "16384M"),
        ("16GB", "15259M"),  # 16e9 / 2**20 = 15258.8, rounded up
        ("1MiB", "1M"),
        ("1MB", "1M"),  # 0.95 MiB rounds up to 1
        ("1.5GiB", "1536M"),
        (1, "1M"),
        ("4TB", "3814698M"),
    ],
)
def test_slurm_mem_is_binary_mib_rounded_up(memory, expected):
    assert slurm_mem(parse_memory(memory)) == expected


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [
        ("01:00:00", "01:00:00"),
        ("30", "00:30:00"),  # a bare number is minutes, as sbatch reads it
        ("90s", "00:01:30"),
        ("1-00:00:00", "1-00:00:00"),
        ("2-03:04:05", "2-03:04:05"),
        ("23:59:59", "23:59:59"),
        ("36h", "1-12:00:00"),
    ],
)
def test_slurm_time(walltime, expected):
    assert slurm_time(parse_duration(walltime)) == expected


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("16GiB", "16gb"),
        ("16GB", "15259mb"),
        ("500MiB", "500mb"),
        ("500MB", "477mb"),
        ("1.5GiB", "1536mb"),
        (1, "1mb"),
    ],
)
def test_pbs_mem_units_are_binary(memory, expected):
    assert pbs_mem(parse_memory(memory)) == expected


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [("01:00:00", "01:00:00"), ("2-00:00:00", "48:00:00"), ("90s", "00:01:30"), (0.5, "00:00:30")],
)
def test_pbs_and_sge_time_are_hms_past_24_hours(walltime, expected):
    seconds = parse_duration(walltime)
    assert pbs_time(seconds) == expected
    assert sge_time(seconds) == expected


@pytest.mark.parametrize(
    ("n_bytes", "expected"),
    [
        (4 * GiB, "4G"),
        (2 * GiB // 8, "256M"),  # per slot of 2 GiB over 8 slots
        (10**9, "954M"),
        (1, "1M"),
    ],
)
def test_sge_mem(n_bytes, expected):
    assert sge_mem(n_bytes) == expected


@pytest.mark.parametrize(
    ("memory", "unit", "expected"),
    [
        ("16GiB", "KB", "16777216"),
        ("16GiB", "MB", "16384"),
        ("16GiB", "GB", "16"),
        ("16GB", "MB", "15259"),
        ("16GB", "GB", "15"),  # 14.9 GiB rounds up
        ("1GiB", "mb", "1024"),  # the unit's case does not matter
        ("1TiB", "TB", "1"),
        ("100MB", "KB", "97657"),
    ],
)
def test_lsf_mem_in_site_unit(memory, unit, expected):
    assert lsf_mem(parse_memory(memory), unit) == expected


def test_lsf_mem_refuses_an_unknown_unit():
    with pytest.raises(ValueError, match="lsf_units='XB'.*KB, MB, GB"):
        lsf_mem(GiB, "XB")


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [
        ("01:00:00", "01:00"),
        ("00:30:01", "00:31"),  # LSF counts minutes: round up
        ("90s", "00:02"),
        ("2-00:00:00", "48:00"),
        ("5", "00:05"),
    ],
)
def test_lsf_time_is_hours_and_minutes(walltime, expected):
    assert lsf_time(parse_duration(walltime)) == expected


@pytest.mark.parametrize(
    ("conf", "expected"),
    [
        (None, "KB"),  # no lsf.conf: LSF's default
        ("LSF_UNIT_FOR_LIMITS=MB\n", "MB"),
        ("# LSF_UNIT_FOR_LIMITS=GB\nLSF_UNIT_FOR_LIMITS = gb\n", "GB"),
        ("LSF_UNIT_FOR_LIMITS=MB\nLSF_UNIT_FOR_LIMITS=GB\n", "GB"),  # the last one wins
        ('LSF_UNIT_FOR_LIMITS="TB"  # comment\n', "TB"),
        ("LSF_UNIT_FOR_LIMITS=lots\n", "KB"),
        ("LSB_SHAREDIR=/x\n", "KB"),
    ],
)
def test_read_lsf_unit_from_lsf_conf(tmp_path, conf, expected):
    if conf is not None:
        (tmp_path / "lsf.conf").write_text(conf)
    assert read_lsf_unit({"LSF_ENVDIR": str(tmp_path)}) == expected


@pytest.mark.parametrize(
    ("n_bytes", "expected"),
    [
        (8 * GiB, "8GiB"),
        (4 * 10**9, "4GB"),
        (500 * MiB, "500MiB"),
        (1536 * MiB, "1536MiB"),
        (3 * KiB, "3KiB"),
        (1000, "1kB"),
        (1001, "1001"),
    ],
)
def test_memory_text_round_trips_through_parse_memory(n_bytes, expected):
    assert memory_text(n_bytes) == expected
    assert parse_memory(expected) == n_bytes
