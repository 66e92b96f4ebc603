"""Pictures and tables for people: layouts now; leaderboards, galleries and plots later."""
