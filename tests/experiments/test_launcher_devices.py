"""The launcher's --devices: client i trains on the (i mod n)-th device; without it, nothing changes."""

import argparse

import pytest

from scripts.local_federation import client_device_args, parse_args, parse_devices


def test_clients_are_spread_round_robin_over_the_devices():
    devices = parse_devices("cuda:0, cuda:1")
    assert [client_device_args(i, devices) for i in range(3)] == \
        [["--device", "cuda:0"], ["--device", "cuda:1"], ["--device", "cuda:0"]]
    assert parse_args(["--devices", "cuda:0,cuda:1", "method=svd"]).devices == ["cuda:0", "cuda:1"]


def test_without_devices_clients_keep_their_default():
    assert parse_args([]).devices is None and client_device_args(5, None) == []


def test_an_empty_device_name_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated devices"):
        parse_devices("cuda:0,,cuda:1")
