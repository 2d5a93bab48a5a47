"""Pure billing rules: amounts, calendar periods, burn-down order, errors.

Standard library only: nothing here performs I/O or knows about HTTP or SQL.
"""
