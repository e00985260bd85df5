"""The Vagrantfile, checked by Vagrant itself (Debian's `vagrant` package, which `scripts/setup.sh
--test` installs): `vagrant validate` passes for every box choice, an unknown choice is refused
with a message naming L7LAB_BOX and the choices, and the settings Vagrant reads from it (box,
the forwarded Prometheus port, the synced folder, the provisioners) are read back per box and per
provider. A broken copy fails validation, so the check can fail.

Offline, as root, without a box downloaded and without provider plugins: VAGRANT_HOME and the
machine's data directory are the test's own (nothing is written into the checkout), and
`--ignore-provider` skips the check that a provider is usable, the one Vagrant documents for
validating without one. The providers' blocks still run: an unknown VirtualBox setting fails the
load. The libvirt block's settings are taken as given without the vagrant-libvirt plugin (Vagrant
hands an unknown provider's block a stand-in that accepts anything), so only its effect on the
machine's own settings (the forwarded port) is checked here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, REPO

VAGRANTFILE = REPO / "Vagrantfile"
BOXES = {"debian12": "debian/bookworm64", "ubuntu2404": "bento/ubuntu-24.04"}
PROMETHEUS_PORT = 9090
# Where each provider's forward reaches in the guest (the Vagrantfile says why).
PROMETHEUS_GUEST_IP = {"virtualbox": "10.0.2.15", "libvirt": "127.0.0.1"}

# The machine's settings as Vagrant computes them for a provider, box Vagrantfiles and provider
# overrides included; `validate_provider: false` lets it do so for a provider whose plugin is absent.
READ_BACK = r"""
require "json"
require "vagrant"
root, home, data = ARGV
env = Vagrant::Environment.new(cwd: root, home_path: home, local_data_path: data, ui_class: Vagrant::UI::Silent)
out = {}
%i[virtualbox libvirt].each do |provider|
  vm = env.vagrantfile.machine_config(:default, provider, env.boxes, nil, false)[:config].vm
  out[provider] = {
    box: vm.box,
    hostname: vm.hostname,
    forwarded_ports: vm.networks.select { |type, _| type == :forwarded_port }.map { |_, options| options },
    synced_folders: vm.synced_folders,
    provisioners: vm.provisioners.map { |p| {name: p.name, type: p.type, inline: p.config.inline, path: p.config.path} },
    # Settings the provider's configuration does not know (a plugin-less provider's stand-in knows all).
    unknown_settings: vm.get_provider_config(provider)._detected_errors,
  }
end
puts JSON.generate(out)
"""


def require_vagrant() -> None:
    if shutil.which("vagrant") is None or shutil.which("ruby") is None:
        message = "vagrant (Debian's package) is missing: scripts/setup.sh --test installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def vagrant_env(tmp_path: Path, root: Path, box: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAGRANT_") and k != "L7LAB_BOX"}
    env.update(VAGRANT_HOME=str(tmp_path / "vagrant-home"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot-vagrant"),
               VAGRANT_CWD=str(root), VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
    if box is not None:
        env["L7LAB_BOX"] = box
    return env


def validate(tmp_path: Path, box: str | None = None, root: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", "validate", "--ignore-provider", "--no-color"], cwd=tmp_path,
                          env=vagrant_env(tmp_path, root, box), capture_output=True, text=True, timeout=120)


def read_back(tmp_path: Path, box: str | None, root: Path = REPO) -> dict[str, Any]:
    out = subprocess.run(["ruby", "-e", READ_BACK, str(root), str(tmp_path / "vagrant-home"), str(tmp_path / "data")],
                         cwd=tmp_path, env=vagrant_env(tmp_path, root, box), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("box", [None, *BOXES])
def test_vagrant_validates_every_box_choice(tmp_path: Path, box: str | None) -> None:
    require_vagrant()
    out = validate(tmp_path, box)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Vagrantfile validated successfully." in out.stdout
    assert not (REPO / ".vagrant").exists()  # the machine's data went to the test's directory


@pytest.mark.parametrize("box", ["centos9", "Debian12", "debian12 "])
def test_an_unknown_box_choice_is_refused(tmp_path: Path, box: str) -> None:
    require_vagrant()
    out = validate(tmp_path, box)
    if box.strip() == "debian12":  # surrounding blanks are forgiven, case is not
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode != 0
    assert f'L7LAB_BOX="{box}" is not a box choice; expected one of debian12, ubuntu2404' in out.stderr


@pytest.mark.parametrize("box", [None, *BOXES])
def test_the_settings_vagrant_reads(tmp_path: Path, box: str | None) -> None:
    require_vagrant()
    machines = read_back(tmp_path, box)
    assert set(machines) == {"virtualbox", "libvirt"}
    for provider, vm in machines.items():
        assert vm["box"] == BOXES[box or "debian12"], provider
        assert vm["unknown_settings"] == [], provider
        assert vm["hostname"] == "l7lab"
        # Every forwarded port listens on the host's loopback only (Vagrant's own SSH port included).
        assert {p["host_ip"] for p in vm["forwarded_ports"]} == {"127.0.0.1"}, vm["forwarded_ports"]
        prometheus = [p for p in vm["forwarded_ports"] if p["id"] == "prometheus"]
        assert prometheus == [{"id": "prometheus", "host_ip": "127.0.0.1", "host": PROMETHEUS_PORT,
                               "guest_ip": PROMETHEUS_GUEST_IP[provider], "guest": PROMETHEUS_PORT,
                               "protocol": "tcp"}], provider
        folder = vm["synced_folders"]["/vagrant"]
        assert folder["hostpath"] == "." and folder["type"] == "rsync" and not folder["disabled"]
        assert set(folder["rsync__exclude"]) == {".venv/", ".git/", ".vm/"}
        assert len(vm["synced_folders"]) == 1
        provisioners = {p["name"]: p for p in vm["provisioners"]}
        assert provisioners["setup"]["type"] == "shell"
        assert provisioners["setup"]["inline"] == "bash /vagrant/scripts/setup.sh"
        # On VirtualBox, scripts/prometheus.sh is told to listen where the forward arrives.
        listen = provisioners.get("prometheus-listen")
        if provider == "virtualbox":
            assert listen is not None and "export L7LAB_PROMETHEUS_LISTEN=%s" in listen["inline"]
            assert f"'{PROMETHEUS_GUEST_IP['virtualbox']}'" in listen["inline"]
            assert "/etc/profile.d/" in listen["inline"]
        else:
            assert listen is None
        assert set(provisioners) <= {"setup", "prometheus-listen"}


@pytest.mark.parametrize("breakage", [
    pytest.param(("  config.vm.hostname = \"l7lab\"\n", "  config.vm.hostname = \"l7 lab\"\n"), id="bad hostname"),
    pytest.param(('setup.sh"\nend\n', 'setup.sh"\n'), id="ruby syntax"),
    pytest.param(('type: "rsync"', 'type: "rsyncc"'), id="unknown synced folder type"),
    pytest.param(('"debian12" => "debian/bookworm64"', '"debian12" => ""'), id="empty box name"),
])
def test_a_broken_vagrantfile_fails_validation(tmp_path: Path, breakage: tuple[str, str]) -> None:
    require_vagrant()
    copy = broken_copy(tmp_path, None)
    assert validate(tmp_path, root=copy).returncode == 0  # the copy as it is passes
    broken_copy(tmp_path, breakage)
    out = validate(tmp_path, root=copy)
    assert out.returncode != 0, out.stdout


def test_an_unknown_virtualbox_setting_is_found(tmp_path: Path) -> None:
    """`validate --ignore-provider` leaves the provider's settings alone; the read-back finds them."""
    require_vagrant()
    copy = broken_copy(tmp_path, ("    vb.memory = 4096\n", "    vb.memroy = 4096\n"))
    machines = read_back(tmp_path, None, root=copy)
    assert machines["virtualbox"]["unknown_settings"] == ["The following settings shouldn't exist: memroy"]


def broken_copy(tmp_path: Path, breakage: tuple[str, str] | None) -> Path:
    """The Vagrantfile copied into tmp_path/copy, with `breakage` (old, new) replaced once."""
    text = VAGRANTFILE.read_text()
    if breakage is not None:
        old, new = breakage
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    copy = tmp_path / "copy"
    copy.mkdir(exist_ok=True)
    (copy / "Vagrantfile").write_text(text)
    return copy
