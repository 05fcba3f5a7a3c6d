"""The job's key space, in one place: the layout other tools read is pinned here."""
import pytest

from elastic.rendezvous.keys import JobKeys


def test_every_key_family():
    k = JobKeys("job7")
    assert k.prefix == "/elastic/job7/"
    assert (k.round(), k.status(), k.restarts()) == ("/elastic/job7/round", "/elastic/job7/status",
                                                      "/elastic/job7/restarts")
    assert (k.join(3), k.join(3, "n1")) == ("/elastic/job7/join/3/", "/elastic/job7/join/3/n1")
    assert k.coordinator(3) == "/elastic/job7/coordinator/3"
    assert (k.alive(), k.alive("n1")) == ("/elastic/job7/alive/", "/elastic/job7/alive/n1")
    assert (k.waiting(), k.waiting("n1")) == ("/elastic/job7/waiting/", "/elastic/job7/waiting/n1")
    assert k.done(3, "n1") == "/elastic/job7/done/3/n1"
    assert k.failures() == "/elastic/job7/failures/"
    assert k.failures(3) == "/elastic/job7/failures/000000000003/"
    assert k.failures(3, 5) == "/elastic/job7/failures/000000000003/5"
    assert k.inproc("n1", 0) == "/elastic/job7/inproc/n1/0"
    assert k.assign("n1", 0) == "/elastic/job7/assign/n1/0"
    assert (k.lostpeer("n1"), k.lostpeer("n1", 0)) == ("/elastic/job7/lostpeer/n1/", "/elastic/job7/lostpeer/n1/0")
    assert k.relative(k.alive("n1")) == "alive/n1"
    assert (k.control(), k.desired(), k.node_range(), k.stop()) == (
        "/elastic/job7/ctl/", "/elastic/job7/ctl/desired", "/elastic/job7/ctl/range", "/elastic/job7/ctl/stop")
    assert (k.drain(), k.drain("n1")) == ("/elastic/job7/ctl/drain/", "/elastic/job7/ctl/drain/n1")


def test_reports_live_outside_the_watched_prefix():
    k = JobKeys("job7")
    reports = [k.settings(), k.node_status(), k.node_status("n1"), k.progress(), k.progress("n1"),
               k.progress("n1", 0), k.events(), k.events("000000000001-n1"), k.straggler()]
    assert reports == ["/elastic-report/job7/settings", "/elastic-report/job7/node/", "/elastic-report/job7/node/n1",
                       "/elastic-report/job7/progress/", "/elastic-report/job7/progress/n1/",
                       "/elastic-report/job7/progress/n1/0", "/elastic-report/job7/events/",
                       "/elastic-report/job7/events/000000000001-n1", "/elastic-report/job7/straggler"]
    assert not any(r.startswith(k.prefix) for r in reports)


def test_from_a_workers_prefix():
    assert JobKeys.from_prefix("/elastic/job7/") == JobKeys("job7")
    with pytest.raises(ValueError):
        JobKeys.from_prefix("/other/job7/")
