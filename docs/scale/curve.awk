# One store's curve from scale.tsv: mode=blades gives its rows at its smallest session count
# (blades grow), mode=sessions its rows at its largest blade count (sessions grow).
BEGIN { FS = "\t" }
$1 == store {
    n++; row[n] = $0; s[n] = $3 + 0; b[n] = $2 + 0
    if (n == 1 || $3 + 0 < smin) smin = $3 + 0
    if (n == 1 || $2 + 0 > bmax) bmax = $2 + 0
}
END {
    for (i = 1; i <= n; i++)
        if ((mode == "blades" && s[i] == smin) || (mode == "sessions" && b[i] == bmax)) print row[i]
}
