"""The generated docs match the declarations, and the README's contract is the code's."""
import re
from pathlib import Path

from vajrad import docgen
from vajrad.serve.socket_api import _Connection
from vajrad.serve.dbus_api import VajraInterface

REPO = Path(__file__).resolve().parent.parent


def test_generated_docs_are_current():
    for name, make in docgen.GENERATED.items():
        assert (REPO / "docs" / name).read_text() == make(), \
            f"docs/{name} is stale: run python -m vajrad.docgen"


def test_documented_socket_methods_exist():
    doc = (REPO / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^### `([a-z/]+)`", doc, re.M))
    implemented = {m[2:].replace("_", "/") for m in dir(_Connection) if m.startswith("m_")}
    assert documented == implemented


def test_documented_dbus_members_exist():
    doc = (REPO / "docs" / "dbus.md").read_text()
    documented = set(re.findall(r"^### `(\w+)", doc, re.M))
    intro = VajraInterface.__dict__
    assert documented == {"Ping", "GetStatus", "ListEvents", "ReadTable", "UpdateAlert", "Version",
                          "EventsCaptured", "EventsLost"}
    assert all(name in intro for name in documented)
