"""Fixtures for simulator tests: a real ``fleet sim`` process and pyVmomi connections to it.

These tests use only unmodified pyVmomi (and plain HTTP for ``/_sim``), as any
third-party tool would.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from tests.simproc import PASSWORD, USER, SimProcess


def connect(sim: SimProcess, user: str = USER, pwd: str = PASSWORD) -> Any:
    if sim.http:
        return SmartConnect(protocol="http", host=sim.host, port=sim.port, user=user, pwd=pwd)
    ctx = ssl.create_default_context(cafile=str(sim.cert_path))
    return SmartConnect(host=sim.host, port=sim.port, user=user, pwd=pwd, sslContext=ctx)


def find_vm(si: Any, name: str) -> Any:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder,
                                                      [vim.VirtualMachine], True)
    try:
        for vm in view.view:
            if vm.name == name:
                return vm
    finally:
        view.DestroyView()
    raise LookupError(name)


def vm_folder(si: Any) -> Any:
    return si.content.rootFolder.childEntity[0].vmFolder


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProcess]:
    with SimProcess(time_scale=0.02) as proc:
        yield proc


@pytest.fixture(scope="module")
def si(sim: SimProcess) -> Iterator[Any]:
    conn = connect(sim)
    yield conn
    Disconnect(conn)
