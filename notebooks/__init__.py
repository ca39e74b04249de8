"""The tutorial notebooks (a package only so that its conftest.py does not shadow the tests' conftest)."""
