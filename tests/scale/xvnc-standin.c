/* A stand-in for Xtigervnc in the scale rig (tests/benches/scale.rs): it takes Xvnc's
 * command line, listens where Xvnc would (-interface, -rfbport), greets every connection
 * with an RFB banner and holds it until the peer closes — what the agent's readiness check
 * and ws-proxy need — in a few pages of memory, so thousands of desktops fit one machine.
 * Run under any other name (a symlink) it is the desktop session: it waits for a signal.
 * Single-threaded, poll(2); SIGTERM ends it, as it ends Xvnc. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_CONNS 256

int main(int argc, char **argv) {
    const char *name = strrchr(argv[0], '/');
    name = name ? name + 1 : argv[0];
    if (strcmp(name, "Xtigervnc") != 0) {
        for (;;) pause();
    }
    const char *iface = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], "-rfbport") == 0) port = atoi(argv[i + 1]);
        if (strcmp(argv[i], "-interface") == 0) iface = argv[i + 1];
    }
    if (port <= 0 || port > 65535) return 2;
    signal(SIGPIPE, SIG_IGN);
    int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, iface, &a.sin_addr) != 1) return 2;
    if (bind(l, (struct sockaddr *)&a, sizeof a) != 0 || listen(l, 64) != 0) return 1;
    struct pollfd fds[MAX_CONNS + 1];
    int n = 1;
    fds[0].fd = l;
    fds[0].events = POLLIN;
    static const char banner[] = "RFB 003.008\n";
    char buf[4096];
    for (;;) {
        if (poll(fds, n, -1) < 0) continue;
        for (int i = n - 1; i >= 1; i--) {
            if (fds[i].revents && read(fds[i].fd, buf, sizeof buf) <= 0) {
                close(fds[i].fd);
                fds[i] = fds[--n];
            }
        }
        if (fds[0].revents & POLLIN) {
            int c;
            while ((c = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                if (n > MAX_CONNS || write(c, banner, sizeof banner - 1) < 0) {
                    close(c);
                    continue;
                }
                fds[n].fd = c;
                fds[n].events = POLLIN;
                n++;
            }
        }
    }
}
