"""Deciding what to do: spec -> reconcile -> placement -> dispatch -> per-clone pipeline."""
