"""The attribute named in the target is not callable."""

MHA = 3
