"""Credentials never appear in logs, errors, reprs or metrics."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from fleet import errors
from fleet.vsphere.model import CloneRequest, GuestCredentials, GuestProgram
from tests.simproc import SimProcess
from tests.vsphere.conftest import client_for, unique

pytestmark = pytest.mark.anyio

VC_PASSWORD = "Vc-Pa55word-7f3a9c"
GUEST_PASSWORD = "Gu3st-Pa55word-91bd"
WRONG_PASSWORD = "Wr0ng-Pa55word-c0de"
SECRETS = (VC_PASSWORD, GUEST_PASSWORD, WRONG_PASSWORD)

TOPOLOGY = f"""
[vcenter]
password = "{VC_PASSWORD}"

[[sources]]
name = "src"
state = "frozen"
guest = {{ password = "{GUEST_PASSWORD}" }}
"""


@pytest.fixture(scope="module")
def ssim() -> Iterator[SimProcess]:
    with SimProcess(topology_text=TOPOLOGY, time_scale=0.02) as process:
        yield process


class Recorder:
    """A metrics observer that keeps everything it is told."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def observe_request(self, method: str, duration_s: float, fault: str | None = None) -> None:
        self.seen.append((method, duration_s, fault))

    def observe_task_fault(self, method: str, fault: str) -> None:
        self.seen.append((method, fault))

    def relogin(self) -> None:
        self.seen.append("relogin")


def _texts(exc: BaseException) -> list[str]:
    out = ["".join(traceback.format_exception(exc))]
    node: BaseException | None = exc
    while node is not None:
        out += [str(node), repr(node), repr(getattr(node, "__dict__", ""))]
        node = node.__cause__ or node.__context__
    return out


async def test_no_credentials_anywhere(ssim: SimProcess, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    recorder = Recorder()

    with pytest.raises(errors.InvalidLogin) as bad_login:
        async with client_for(ssim, password=WRONG_PASSWORD, observer=recorder):
            pass
    texts += _texts(bad_login.value)

    client = client_for(ssim, password=VC_PASSWORD, observer=recorder)
    texts += [repr(client), str(client)]
    async with client as vs:
        texts += [repr(vs.session), repr(vs.transport), repr(vs.session.stub), repr(vs.stats)]
        (src,) = await vs.find_vms(["src"])
        folder = await vs.ensure_folder("s")
        made = await (await vs.start_instant_clone(CloneRequest(
            source=src.ref, name=unique("s"), folder=folder))).wait(timeout_s=10)
        good = GuestCredentials("root", GUEST_PASSWORD)
        texts.append(repr(good))
        assert await vs.run_in_guest(made, good, GuestProgram("/bin/true"), timeout_s=10) == 0
        with pytest.raises(errors.InvalidGuestLogin) as bad_guest:
            await vs.run_in_guest(made, GuestCredentials("root", WRONG_PASSWORD),
                                  GuestProgram("/bin/true"), timeout_s=10)
        texts += _texts(bad_guest.value)
        # Expire the session: the re-login must not log the password either.
        await anyio.to_thread.run_sync(ssim.expire_sessions)
        assert (await vs.get_vm(made)).name
        assert vs.stats["relogins"] == 1
        texts.append(repr(vs.stats))

    texts.append(caplog.text)
    texts += [r.getMessage() + repr(r.args) for r in caplog.records]
    texts.append(repr(recorder.seen))
    assert "relogin" in recorder.seen and any(m == "Login" for m, *_ in
                                              [s for s in recorder.seen if isinstance(s, tuple)])
    assert any("logged in" in r.getMessage() for r in caplog.records)
    blob = "\n".join(texts)
    for secret in SECRETS:
        assert secret not in blob
    # The user name is not logged either (only the endpoint).
    assert "administrator@vsphere.local" not in caplog.text
