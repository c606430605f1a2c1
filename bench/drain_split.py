"""CPU per message of each daemon of a local drain, workers of qmail-lspawn off and on, alternated.

usage: python bench/drain_split.py [ROUNDS]

bench/drain.py's set-up (single-user home, 300 messages of 4 KB, concurrencylocal 10). When
the log shows the last "end msg", the bench reads /proc/PID/stat of qmail-send and of each of
its children (user+system, with the reaped children's times) and of each live grandchild (the
workers), and prints ms per message by daemon. Run as root it drops to pqtest.
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import drain  # noqa: E402

HZ = os.sysconf('SC_CLK_TCK')
def st(pid):
    f = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return (int(f[11]) + int(f[12])) / HZ, (int(f[13]) + int(f[14])) / HZ
def comm(pid): return open(f'/proc/{pid}/comm').read().strip()
def kids(pid):
    out = []
    for t in os.listdir(f'/proc/{pid}/task'):
        out += [int(x) for x in open(f'/proc/{pid}/task/{t}/children').read().split()]
    return out
def main() -> None:
    if os.geteuid() == 0:
        drain.as_user('pqtest')
    for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        for w in ('0', '10'):
            home, md = drain.setup(10); drain.fill(home, 300, 4096)
            os.environ['PYQMAIL_LSPAWN_WORKERS'] = w
            snap = {}
            count = [0]
            def on_line(line):
                if line.startswith(b'end msg '):
                    count[0] += 1
                    if count[0] == 300:
                        # qmail-send is our only child
                        (send,) = kids(os.getpid())
                        tot = {}
                        s, c = st(send); tot['qmail-send'] = s
                        for k in kids(send):
                            ks, kc = st(k)
                            extra = sum(sum(st(g)) for g in kids(k))
                            tot[comm(k)] = tot.get(comm(k), 0) + ks + kc + extra
                        snap.update(tot)
            common.run_send_until(home, 300, {"PATH": f"{home}/bin:/usr/bin:/bin"}, on_line)
            print(f'round {r+1} workers={w:>2}', {k: round(v / 300 * 1000, 2) for k, v in sorted(snap.items())}, f'load {os.getloadavg()[0]:.1f}', flush=True)
            shutil.rmtree(os.path.dirname(home), ignore_errors=True)


if __name__ == '__main__':
    main()
