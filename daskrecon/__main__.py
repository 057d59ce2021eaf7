"""``python -m daskrecon``: the ``daskrecon`` command, where its script is not on ``PATH`` (a module
environment on a cluster, a notebook's ``!python -m daskrecon demo``)."""

from daskrecon.cli import app

app(prog_name="daskrecon")
