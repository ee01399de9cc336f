"""forward calls sys.exit(0) (a stray `exit()` left in while debugging): SystemExit is not an
Exception, so it must still be caught and reported, never end the run with status 0."""

import sys

from attnspec.impl import MultiHeadAttention


class MHA(MultiHeadAttention):
    def forward(self, x):
        sys.exit(0)
