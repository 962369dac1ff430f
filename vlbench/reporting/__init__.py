"""Reporting: leaderboards from result files (`leaderboard`)."""
