"""The one exception family for mistakes a user can fix (bad data, bad config, wrong checkpoint).

launch.py prints these as a readable message instead of a traceback; everything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
  """Raised for input a user can correct; the message says what is wrong and where."""
