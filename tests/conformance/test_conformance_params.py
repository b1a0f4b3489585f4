"""scripts/conformance --config params: both sides are set up as one machine.

The real kernel gets the module options on its command line (scripts/vm
--append, which /init hands to insmod as modprobe would) and intel-iommu
options (--iommu); cuse-vfio gets tests/conformance/params.toml.  These
tests check that the two say the same thing, and that scripts/vm takes and
refuses those options as documented; the live comparison itself is the
conformance stage of scripts/test.
"""

import importlib.machinery
import importlib.util
import os
import subprocess

import pytest

from cuse_vfio.machine import topology

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))


def script(name):
    path = os.path.join(TOP, "scripts", name)
    loader = importlib.machinery.SourceFileLoader("script_" + name, path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def kernel_word_value(text):
    """A kernel command-line value as the module's param type reads it."""
    return {"1": True, "Y": True, "y": True, "0": False, "N": False, "n": False}.get(text, text)


@pytest.mark.parametrize("config", ["params", "nointremap"])
def test_the_topology_sets_exactly_what_the_real_kernel_gets(config):
    cfg = script("conformance").CONFIGS[config]
    topo = topology.load(cfg.topology)
    from_words = {}
    for w in cfg.append:
        key, value = w.split("=", 1)
        module, param = key.split(".", 1)
        v = kernel_word_value(value)
        from_words.setdefault(module, {})[param] = int(v) if isinstance(v, str) else v
    assert topo.modules == from_words
    iommu = dict(o.split("=") for o in cfg.iommu.split(","))
    assert topo.iommu.aw_bits == int(iommu.pop("aw-bits", "39"))         # QEMU 7.2's default
    assert topo.iommu.intremap == (iommu.pop("intremap", "on") == "on")   # scripts/vm's default
    assert not iommu, "every intel-iommu option has its topology counterpart"
    assert cfg.client_args[:2] in ([], ["2", topo.devices[0].bdf])
    vm = topology.load(script("conformance").CONFIGS["default"].topology)
    assert (topo.devices, topo.root_ports) == (vm.devices, vm.root_ports), "the machine of vm.toml, as it is"


def test_vm_toml_is_the_machine_scripts_vm_boots():
    """Each edu of scripts/vm --mode vfio-edu at its address and in its group, its root ports at theirs."""
    layout = script("vm").VFIO_EDU_DEVICES
    vm = topology.load(script("conformance").CONFIGS["default"].topology)
    assert [(d.bdf, d.model, d.group) for d in vm.devices] == \
        [(bdf, options.split(",")[0], group) for options, bdf, group in layout if options.startswith("edu,")]
    assert [rp.bdf for rp in vm.root_ports] == \
        [bdf for options, bdf, _ in layout if options.startswith("pcie-root-port,")]
    # each device behind a root port names it as its bus (bus=rpN), at the secondary bus the topology gives
    ids = {options.split("id=")[1].split(",")[0]: bdf for options, bdf, _ in layout if "id=" in options}
    for options, bdf, _ in layout:
        parent = next((o.split("=")[1] for o in options.split(",") if o.startswith("bus=rp")), None)
        if parent is not None:
            assert vm.root_port_of(int(bdf[5:7], 16)).bdf == ids[parent]


def test_scripts_vm_takes_kernel_words_and_iommu_options():
    vm = script("vm")
    o, argv = vm.parse(["--mode", "vfio-edu", "--append", "a.b=1 c.d=2", "--append", "e.f=3",
                        "--iommu", "aw-bits=48", "--", "true"])
    assert o.append == ["a.b=1", "c.d=2", "e.f=3"] and o.iommu == "aw-bits=48" and argv == ["true"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "cuse", "--iommu", "aw-bits=48"], "--iommu needs --mode vfio-edu"),
    (["--mode", "vfio-edu", "--iommu", "aw-bits=48,-device x"], "bad --iommu"),
    (["--mode", "vfio-edu", "--iommu", "aw-bits"], "bad --iommu"),
])
def test_scripts_vm_refuses_bad_iommu_options(args, message):
    vm = script("vm")
    with pytest.raises(vm.UsageError, match=message):
        vm.parse(args + ["--", "true"])


def test_init_hands_command_line_module_options_to_insmod(tmp_path):
    """/init's modopts picks NAME.PARAM=VALUE words for module NAME (- and _ alike)."""
    with open(os.path.join(TOP, "scripts", "vmlib", "init.sh")) as f:
        text = f.read()
    start = text.index("modopts() {")
    body = text[start:text.index("\n}\n", start) + 3]
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 vfio_iommu_type1.dma_entry_limit=16 vfio-pci.nointxmask=1"
                       " vfio_pci.disable_idle_d3=1 a=b.c=d vfio.x\n")
    body = body.replace("/proc/cmdline", str(cmdline))

    def run(module_file):
        return subprocess.run(["sh", "-c", body + 'modopts "$1"', "sh", module_file],
                              capture_output=True, text=True, check=True).stdout

    assert run("07-vfio_pci.ko").split() == ["nointxmask=1", "disable_idle_d3=1"]
    assert run("05-vfio_iommu_type1.ko").split() == ["dma_entry_limit=16"]
    assert run("04-vfio.ko").split() == ["x"]      # a bare NAME.PARAM, as modprobe passes it
    assert run("03-cuse.ko").split() == []
