"""A FastAPI application that starts workflows and talks to them: see main.py."""
