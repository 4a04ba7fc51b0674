from esper_cli.main import app

app(prog_name="esper")
