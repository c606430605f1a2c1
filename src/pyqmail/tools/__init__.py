"""The small local tools: preline, forward, condredirect, bouncesaying, except, maildirmake, ..."""
