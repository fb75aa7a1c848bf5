rule aggregate:
    """Per-experiment comparison: summary.csv (CIs, paired tests vs the reference, ranks) and
    figures."""
    input:
        experiment_inputs,
    output:
        **experiment_outputs(),
    params:
        spec=experiment_spec,
        dir=lambda wc, output: os.path.dirname(output.summary),
    log:
        f"{LOGS}/aggregate/{{experiment}}.log",
    wildcard_constraints:
        experiment=names_regex(set(config["experiments"]) - set(sweep_experiments())),
    conda:
        ENV
    shell:
        "python -m segpipe aggregate --experiment {wildcards.experiment} --spec {params.spec:q}"
        " --output-dir {params.dir} > {log} 2>&1"


use rule aggregate as aggregate_sweep with:
    output:
        **experiment_outputs(sweep=True),
    wildcard_constraints:
        experiment=names_regex(sweep_experiments()),


rule summary:
    """<results>/summary.md: one table per experiment and its verdicts vs the reference."""
    input:
        expand(f"{EXPERIMENT_DIR}/summary.csv", experiment=config["experiments"]),
    output:
        report(SUMMARY, caption="../report/summary.rst", category="Summary"),
    params:
        dirs=lambda wc, input: [os.path.dirname(f) for f in input],
    log:
        f"{LOGS}/summary.log",
    conda:
        ENV
    shell:
        "python -m segpipe summary --experiments {params.dirs} --output {output} > {log} 2>&1"
