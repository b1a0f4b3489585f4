import pytest

from cuse_vfio.machine.topology import TopologyError, load, parse

MODELS = {"edu", "scratchpad"}


def test_default_topology_is_edu_in_group_2():
    t = load(None, MODELS)
    (d,) = t.devices
    assert (d.bdf, d.model, d.group) == ("0000:00:02.0", "edu", 2)
    assert t.groups[2].mode == 0o600 and t.groups[2].uid == 0


def test_groups_with_owner_and_mode():
    t = parse('[[device]]\nbdf = "0000:00:03.0"\nmodel = "edu"\ngroup = 5\n'
              '[group.5]\nowner = "root"\ngroup = 0\nmode = "0660"\n', "t.toml", MODELS)
    assert t.groups[5].mode == 0o660


@pytest.mark.parametrize("text,needle", [
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "nope"\ngroup = 2\n', "line 3: unknown device model 'nope'"),
    ('[[device]]\nbdf = "00:02.0"\nmodel = "edu"\ngroup = 2\n', "line 2: bdf '00:02.0' is not a PCI address"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\n', "line 1: device #1 has no 'group'"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n\n[[device]]\nbdf = "0000:00:02.0"\n'
     'model = "edu"\ngroup = 3\n', "line 7: bdf 0000:00:02.0 appears twice"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n[group.2]\nmode = "rw"\n',
     "line 6: mode 'rw' is not an octal string"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n[group.3]\n', "line 5: [group.3] names no group"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = 2\n[group.2]\nowner = "no-such-user-x"\n',
     "line 6: no user named 'no-such-user-x'"),
    ('[[device]\nbdf = 1\n', "not valid TOML"),
    ('', "no [[device]] entry"),
    ('[[device]]\nbdf = "0000:00:02.0"\nmodel = "edu"\ngroup = -1\n', "line 4: group -1 is not an IOMMU group"),
])
def test_bad_topologies_name_the_line(text, needle):
    with pytest.raises(TopologyError) as e:
        parse(text, "t.toml", MODELS)
    assert needle in str(e.value)
    assert str(e.value).startswith("t.toml")


def test_unreadable_file(tmp_path):
    with pytest.raises(TopologyError) as e:
        load(str(tmp_path / "missing.toml"), MODELS)
    assert "cannot read the topology file" in str(e.value)
