from zerovl.cli import entry

entry()
