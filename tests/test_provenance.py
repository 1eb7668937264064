import subprocess

from vitlab import provenance


def test_the_commit_is_read_once_per_process(monkeypatch):
    """A process runs the code it imported: a commit made while it trains (a study's later runs included) is not it."""
    answers = iter(["aaaa\n", "", "bbbb\n", ""])  # rev-parse, then status --porcelain (clean), twice over

    def fake_git(args, **options):
        return subprocess.CompletedProcess(args, 0, stdout=next(answers), stderr="")

    provenance.git_commit.cache_clear()
    monkeypatch.setattr(provenance.subprocess, "run", fake_git)
    try:
        assert provenance.git_commit() == "aaaa"
        assert provenance.git_commit() == "aaaa"  # not "bbbb": read once
    finally:
        provenance.git_commit.cache_clear()
