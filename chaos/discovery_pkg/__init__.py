"""A workflow package with one good module and one that raises at import (the bad_input scenario)."""
