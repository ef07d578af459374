"""Ways to show a Trace and its findings (measuring is kept apart, in probe and detect)."""
