"""Our own tests draw with the property suite's Hypothesis profiles (attention/suite/profiles.py)."""

from attention.suite import profiles

profiles.load()
