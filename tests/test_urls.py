"""fleet.urls: one check for every URL fleet accepts, one redaction for every URL shown."""

from __future__ import annotations

import pytest

from fleet.errors import ConfigError
from fleet.urls import redact_url, url_problem
from fleet.vsphere.client import VSphereClient


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user%40vsphere.local:SECRET@vc/sdk", "https://***@vc/sdk"),
    ("https://u:p@ss@vc/sdk", "https://***@vc/sdk"),       # "@" in the password
    ("https://u:p/ss@vc/sdk", "https://***@vc/sdk"),       # "/" in the password
    ("user:SECRET@vc:443", "***@vc:443"),
    ("https://vc.example.com/sdk", "https://vc.example.com/sdk"),
    ("", ""),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "SECRET" not in redact_url(url)


@pytest.mark.parametrize("url", ["https://vc.example.com/sdk", "http://127.0.0.1:8989/sdk",
                                 "https://[::1]:443/sdk", "https://vc/", "https://VC:1"])
def test_good_urls(url: str) -> None:
    assert url_problem(url) is None


@pytest.mark.parametrize(("url", "fragment"), [
    ("https://u:p@vc/sdk", "has a user name or password"),
    ("https://vc:99999/sdk", "its port"), ("https://vc:abc/sdk", "its port"),
    ("https://vc:0/sdk", "its port"), ("https://[::1/sdk", "IPv6"),
    ("https://[nope]/sdk", "IPv6"), ("ftp://vc/sdk", "is not an http(s) URL like"),
    ("vc.example.com", "is not an http(s) URL like"), ("HTTPS://vc/sdk", "like"),
    ("https://vc/sdk#x", "fragment"),
    ("https://vc/sdk?a=b", "query"), ("https://v c/sdk", "whitespace"),
    ("https://vc\r\n/sdk", "control"), ("https://-vc-/sdk", "neither a host name"),
])
def test_bad_urls(url: str, fragment: str) -> None:
    problem = url_problem(url)
    assert problem is not None and fragment in problem


def test_the_client_refuses_user_info_without_showing_it() -> None:
    with pytest.raises(ConfigError) as info:
        VSphereClient("https://admin:SECRET@vc.example.com/sdk", "admin", "pw")
    assert "SECRET" not in str(info.value) and "***@vc.example.com" in str(info.value)
