"""Sessions, permissions, API levels, fault injection, the control API and bad topologies."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from pyVim.task import WaitForTask
from pyVmomi import SoapStubAdapter, vim, vmodl

from tests.sim.conftest import connect, find_vm, vm_folder
from tests.sim.test_clone import clone_spec
from tests.simproc import PASSWORD, USER, SimProcess

SMALL = """
[latency]
instant_clone_s = 0.05
jitter = 0.0
[[hosts]]
name = "esx-01"
[[sources]]
name = "src"
state = "frozen"
"""


def test_idle_session_expires_and_relogin_works() -> None:
    topology = SMALL.replace("[latency]", "[vcenter]\nsession_idle_timeout_s = 0.5\n[latency]")
    with SimProcess(topology_text=topology, time_scale=1.0) as proc:
        si = connect(proc)
        assert si.content.rootFolder.name == "Datacenters"
        time.sleep(0.8)
        with pytest.raises(vim.fault.NotAuthenticated):
            _ = si.content.rootFolder.childEntity
        si.content.sessionManager.Login(USER, PASSWORD, None)
        assert si.content.rootFolder.childEntity[0].name == "dc1"


def test_expire_sessions_control_endpoint_and_logout() -> None:
    with SimProcess(topology_text=SMALL) as proc:
        si = connect(proc)
        other = connect(proc)
        assert proc.expire_sessions() == 2
        with pytest.raises(vim.fault.NotAuthenticated):
            _ = si.content.rootFolder.childEntity
        other.content.sessionManager.Login(USER, PASSWORD, None)
        other.content.sessionManager.Logout()
        with pytest.raises(vim.fault.NotAuthenticated):
            _ = other.content.rootFolder.childEntity
        assert proc.stats()["sessions"] == 0


def test_denied_privilege_is_no_permission_naming_it() -> None:
    topology = SMALL + """
    [[users]]
    name = "viewer"
    password = "viewer-pass"
    denied = ["VirtualMachine.Provisioning.Clone", "Folder.Create"]
    """
    with SimProcess(topology_text=topology) as proc:
        si = connect(proc, user="viewer", pwd="viewer-pass")
        source = find_vm(si, "src")
        with pytest.raises(vim.fault.NoPermission) as err:
            source.InstantClone_Task(clone_spec("np", vm_folder(si)))
        assert err.value.privilegeId == "VirtualMachine.Provisioning.Clone"
        assert err.value.object == source
        with pytest.raises(vim.fault.NoPermission) as err2:
            vm_folder(si).CreateFolder("x")
        assert err2.value.privilegeId == "Folder.Create"


def test_old_api_endpoint() -> None:
    topology = SMALL.replace("[latency]", '[vcenter]\napi_version = "6.5"\n[latency]')
    with SimProcess(topology_text=topology) as proc:
        si = connect(proc)
        assert si.content.about.apiVersion == "6.5"
        assert si._stub.version == "vim.version.version11"
        # A client insisting on a newer version still finds no InstantClone here.
        stub = SoapStubAdapter(host=proc.host, port=proc.port, version="vim.version.v8_0_3_0",
                               sslContext=__import__("ssl").create_default_context(
                                   cafile=str(proc.cert_path)))
        new_si = vim.ServiceInstance("ServiceInstance", stub)
        new_si.content.sessionManager.Login(USER, PASSWORD, None)
        vm = find_vm(new_si, "src")
        with pytest.raises(vmodl.fault.MethodNotFound):
            vm.InstantClone_Task(clone_spec("nope"))


def test_esxi_endpoint_refuses_instant_clone() -> None:
    topology = SMALL.replace("[latency]", '[vcenter]\nkind = "esxi"\n[latency]')
    with SimProcess(topology_text=topology) as proc:
        si = connect(proc)
        assert si.content.about.apiType == "HostAgent"
        with pytest.raises(vmodl.fault.NotSupported):
            find_vm(si, "src").InstantClone_Task(clone_spec("nope"))


def test_fault_rules_from_topology_and_at_run_time() -> None:
    topology = SMALL + """
    [[faults]]
    method = "InstantClone_Task"
    object = "src"
    fault = "TaskInProgress"
    max_count = 1
    """
    with SimProcess(topology_text=topology) as proc:
        si = connect(proc)
        source = find_vm(si, "src")
        folder = vm_folder(si)
        first = source.InstantClone_Task(clone_spec("f-1", folder))
        with pytest.raises(vim.fault.TaskInProgress):
            WaitForTask(first)
        second = source.InstantClone_Task(clone_spec("f-2", folder))
        WaitForTask(second)
        assert proc.stats()["faults_injected"] == 1
        # call-phase rule added at run time, with a glob
        proc.add_faults({"method": "Create*", "fault": "vim.fault.InvalidState",
                         "phase": "call", "max_count": 2})
        for _ in range(2):
            with pytest.raises(vim.fault.InvalidState):
                folder.CreateFolder("blocked")
        folder.CreateFolder("blocked")
        assert proc.stats()["faults_injected"] == 3
        assert proc.clear_faults() == {"removed": 2}


def test_http_level_faults() -> None:
    with SimProcess(topology_text=SMALL) as proc:
        si = connect(proc)
        source = find_vm(si, "src")
        proc.add_faults({"method": "Fetch", "object": "src", "fault": "http:503", "max_count": 1})
        with pytest.raises(http.client.HTTPException, match="503"):
            _ = source.name
        assert source.name == "src"
        proc.add_faults({"method": "Fetch", "fault": "http:reset", "max_count": 1})
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _ = source.name
        assert source.name == "src"
        # Lost reply: the clone is made, the caller never hears of it.
        proc.add_faults({"method": "InstantClone_Task", "fault": "http:lost_reply",
                         "max_count": 1})
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            source.InstantClone_Task(clone_spec("lost-1", vm_folder(si)))
        deadline = time.monotonic() + 10
        while proc.stats()["clones_total"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert find_vm(si, "lost-1").runtime.powerState == "poweredOn"
        assert proc.stats()["faults_by_type"] == {"http:503": 1, "http:reset": 1,
                                                  "http:lost_reply": 1}


def test_slow_rule_delays_tasks() -> None:
    with SimProcess(topology_text=SMALL, time_scale=1.0) as proc:
        si = connect(proc)
        proc.add_faults({"method": "InstantClone_Task", "fault": "slow", "delay_s": 0.6})
        task = find_vm(si, "src").InstantClone_Task(clone_spec("slow-1", vm_folder(si)))
        WaitForTask(task)
        assert (task.info.completeTime - task.info.startTime).total_seconds() >= 0.6


def test_host_disconnect_fails_clones_with_host_state(sim: SimProcess, si: Any) -> None:
    sim.set_host("esx-04", "disconnected")
    try:
        host = si.content.searchIndex.FindByInventoryPath("dc1/host/cluster1/esx-04")
        assert host.runtime.connectionState == "disconnected"
        source = find_vm(si, "frozen-04")
        assert source.runtime.connectionState == "disconnected"
        task = source.InstantClone_Task(clone_spec("on-dead-host", vm_folder(si)))
        with pytest.raises(vim.fault.InvalidHostConnectionState):
            WaitForTask(task)
    finally:
        sim.set_host("esx-04", "connected")


def _post(proc: SimProcess, path: str, body: bytes, ctype: str = "application/json") -> Any:
    req = urllib.request.Request(proc.base_url + path, data=body, method="POST",
                                 headers={"Content-Type": ctype})
    return proc._opener.open(req, timeout=10)


def test_control_api_rejects_bad_input(sim: SimProcess) -> None:
    for path, body in [("/_sim/faults", b"not json"),
                       ("/_sim/faults", json.dumps({"fault": "NoSuchFault"}).encode()),
                       ("/_sim/faults", json.dumps({"fault": "http:418"}).encode()),
                       ("/_sim/faults", json.dumps({"fault": "InvalidState",
                                                    "probability": 2}).encode()),
                       ("/_sim/hosts/esx-01", json.dumps({"connection_state": "gone"}).encode()),
                       ("/_sim/vms/frozen-01", json.dumps({"chain_depth": 300}).encode())]:
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(sim, path, body)
        assert err.value.code == 400, path
        assert err.value.read(), path  # a message saying what is wrong
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(sim, "/_sim/hosts/nope", b"{}")
    assert err.value.code == 404


def test_garbage_soap_is_a_client_fault(sim: SimProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(sim, "/sdk", b"<not-soap", "text/xml")
    assert err.value.code == 500
    assert b"ClientFaultCode" in err.value.read()


def test_stats_count_soap_body_bytes(sim: SimProcess) -> None:
    before = sim.stats()["soap_bytes"]
    body = b"<not-soap"
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(sim, "/sdk", body, "text/xml")
    reply = err.value.read()
    after = sim.stats()["soap_bytes"]
    # the control API's own traffic (these stats) is not SOAP and is not counted
    assert after["requests"] - before["requests"] == len(body)
    assert after["responses"] - before["responses"] == len(reply) > 0


def test_stats_keys(sim: SimProcess) -> None:
    stats = sim.stats()
    for key in ("vms", "clones_total", "sources", "max_clone_chain_depth", "network_conflicts",
                "faults_injected", "tasks"):
        assert key in stats
    assert set(stats["tasks"]) >= {"queued", "running"}
    assert set(stats["sources"]["frozen-01"]) >= {"chain_depth", "frozen", "clones"}


@pytest.mark.parametrize(("text", "expected"), [
    ("hosts = 3", "hosts: Input should be a valid list"),
    ("[[hosts]]\nname = 'h'\nslots = 0", "hosts[0].slots"),
    ("[[sources]]\nname = 'a'\nhost = 'missing'", "sources[0].host: 'missing' is not a host"),
    ("[[sources]]\nname = 'a'\nchain_depth = 256", "sources[0].chain_depth"),
    ("[[sources]]\nname = 'a'\n[[vms]]\nname = 'a'", "vms[0].name: 'a' is already used"),
    ("[vcenter]\napi_version = '9.9.9'", "vcenter.api_version"),
    ("[[faults]]\nfault = 'Bogus'", "faults[0].fault"),
    ("colour = 'blue'", "colour: unknown key"),
    ("[[hosts]]\nname = 'h-{index'\ncount = 2", "hosts[0].name"),
    ("this is = = not toml", "not valid TOML"),
    ("[[users]]\nname = 'u'\npassword = 'p'\ndenied_on = { nowhere = ['Folder.Create'] }",
     "users[0].denied_on: 'nowhere' is not an entity"),
    ("[[hosts]]\nname = 'h'\nmaintenance = 'maybe'", "hosts[0].maintenance"),
])
def test_bad_topology_is_a_clear_error(tmp_path: Any, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run([sys.executable, "-m", "fleet", "sim", "--topology", str(path),
                             "--listen", "127.0.0.1:0"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(path) in result.stderr
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--listen", "nonsense"], "--listen"),
    (["--listen", "127.0.0.1:99999"], "out of range"),
    (["--time-scale", "0"], "--time-scale"),
    (["--topology", "/no/such/file.toml"], "cannot read topology file"),
    (["--cert-file", "/no/such.pem"], "--cert-file"),
])
def test_bad_sim_options_are_clear_errors(args: list[str], expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", "fleet", "sim", "--listen", "127.0.0.1:0",
                             *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in result.stderr, result.stderr
